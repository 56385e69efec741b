"""The worker runtime: a node registers its capacity, claims what core.plan() chooses, runs handlers."""
