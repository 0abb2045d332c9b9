"""The modules of scripts/bench, the performance benchmark of outboxd (scripts/bench's own docstring
says what it measures and how; this package is how it is done).

Listed from the bottom up. A module imports only modules listed above it, never one below, so
each can be read knowing only what comes before it; scripts/bench, the entry point, sits on top.

  common    constants (subjects, transaction and body sizes, stream and publication names, the
            test server's settings), REPO, log() and fmt_int()
  procfs    /proc readers: CPU seconds, peak RSS, threads and context switches of a process;
            the CPU meters of a phase (PostgreSQL, nats-server, everything else on the machine)
  stats     figures from samples: Prometheus text to histogram to quantile, percentiles, the
            floor's independent sum, the latency files the helper processes leave
  servers   the run's state (class Bench): its temporary folder, starting and stopping every
            process by PID, PostgreSQL and nats-server, replication slots, the relay process;
            NatsRaw, the JetStream request client
  backlog   the rows: the INSERT of outbox events, writing a backlog of N events
  limits    limit A (pg_recvlogical), limit B (bench_publish), limit A+B (both at once)
  drain     outboxd draining a backlog: time, CPU, RSS, threads, context switches
  live      the paced writer and the latency subscriber (helper processes: scripts/bench
            --_role writer|subscriber), one live step with the relay, one floor step without
  profile   callgrind over the relay draining a backlog
  report    the targets and the text tables, from the results dict alone
  run       the order of the phases (one run, its results dict) and the machine's description

Every function that acts on the run takes the Bench as its first argument, `bench`.
tests/docs/check.py holds the modules to LAYERS: each imports only those before it.
"""

LAYERS = ["common", "procfs", "stats", "servers", "backlog", "limits", "drain", "live", "profile",
          "report", "run"]
