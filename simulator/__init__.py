"""A SimPy discrete-event simulator that drives `queue_service.core` with simulated time.

It replays scenario files and generated workloads deterministically: what-if
capacity planning and a check of the policy, not a second implementation of it.
"""
