"""Everything that imports glue or Qt lives under this package."""
