"""dd-dist: distributed dropout distillation (Rota Bulò et al., ICML 2016)."""

__version__ = "0.1.0"
