"""The pure domain: job model, state machine, backoff, DAG rules and the scheduling policy.

Synchronous and free of I/O: no clock is read and no randomness drawn here; time
and entropy are parameters. The live service and the simulator are its two shells.
"""
