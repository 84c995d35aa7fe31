"""`server.workers = N > 1`: N front-end processes (HTTP, validation, tokenizing, encoding) and one
engine process (queues, schedulers, model threads, admission, stats, metrics), under one supervisor.

  supervisor.py     the parent: binds the listening socket once, starts the engine and the front
                    ends, restarts a front end that dies, forwards SIGTERM/SIGINT, exits 0 after a drain
  engine_server.py  the engine process: today's engines, fed by messages from every front end
  client.py         in each front end: RemoteEngine objects with the methods the routes use
  ../ipc.py         the messages and their framing

`server.workers = 1` uses none of this: one process, no IPC.
"""
