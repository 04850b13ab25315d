"""The runtime: the scheduler actor, the dispatcher and its wire protocol, the backends that start
workers. Nothing here is public API; `depio.Pipeline` and `depio.Executors` are its front door."""
