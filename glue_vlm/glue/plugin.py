"""Glue plugin entry point: adds **Plugins > VLM Classifier** to the menu bar.

Registered in ``setup.cfg`` under ``glue.plugins``. Glue calls :func:`setup` at start;
without glue-qt (glue used headless) registration is skipped and the package still
imports.
"""

from __future__ import annotations

__all__ = ["setup", "open_panel", "MENU_LABEL"]

MENU_LABEL = "VLM Classifier"


def open_panel(session, data_collection):
    """Open the panel as a dock on the main window, or bring back the one already
    there; returns it."""
    from qtpy import QtCore, QtWidgets

    from .panel import OBJECT_NAME, ClassifierPanel

    window = session.application
    panel = window.findChild(QtWidgets.QDockWidget, OBJECT_NAME)
    if panel is None:
        panel = ClassifierPanel(session, data_collection, parent=window)
        window.addDockWidget(QtCore.Qt.RightDockWidgetArea, panel)
    panel.show()
    panel.raise_()
    return panel


def setup():
    try:
        from glue_qt.config import menubar_plugin
    except ImportError:  # glue without Qt: nothing to register
        return
    if not any(label == MENU_LABEL for label, _ in menubar_plugin):
        menubar_plugin.add(MENU_LABEL, open_panel)
