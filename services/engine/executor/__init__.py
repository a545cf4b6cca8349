"""Between the engine and the model: the ranks that execute each step's plan.

Owns nothing yet but the collectives of a tensor-parallel group (``collectives``).
"""
