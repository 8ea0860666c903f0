"""Engines behind one protocol (see ``base``); each module imports its heavy
dependencies only when an engine is created."""
