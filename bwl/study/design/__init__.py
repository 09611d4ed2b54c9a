"""The study's design: its vocabulary (concepts, adapter keys, cells, grids, metrics), its profiles ("the defaults,
except…") and the run keys that name every adapter by what can change it. Imports no other room of the study."""
