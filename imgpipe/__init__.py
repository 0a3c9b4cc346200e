"""imgpipe: class-imbalance-aware image classification on Ray (data → train → tune → bundle → serve)."""

__version__ = "0.1.0"
