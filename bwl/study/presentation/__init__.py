"""Presentation: figures, the notebooks' tables, the block explorer widget and the demo. The study's top room."""
