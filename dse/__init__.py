"""dse: distributed design-space exploration for ML hardware/software co-design.

`dse` composes the plain libraries (`quant`, `evaluators`, `simulators`) into searches:
study specs, the Optuna ask/tell driver over Ray actors, resume, and the CLI.
"""

__version__ = "0.1.0"
