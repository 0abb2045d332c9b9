"""Reading /proc: CPU seconds, peak RSS, threads and context switches of one process; the CPU of
the whole PostgreSQL server; ForeignMeter, the CPU of processes that are not this benchmark's;
CpuMeter, the snapshots every phase takes around its measurement."""

import os
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(path):
    """The fields of a /proc/.../stat file after the command name: [0] is field 3 (state), so
    ppid is [1], utime [11], stime [12], cutime [13], cstime [14], starttime [19]."""
    with open(path) as f:
        return f.read().rsplit(")", 1)[1].split()


def all_stats():
    """(pid, stat_fields) of every process; one that ends meanwhile is left out."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            yield int(d), stat_fields(f"/proc/{d}/stat")
        except OSError:
            pass


def ctx_switches(path):
    """Voluntary + involuntary context switches from a /proc/.../status file."""
    n = 0
    with open(path) as f:
        for line in f:
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                n += int(line.split()[1])
    return n


def proc_cpu(pid, children=False):
    """utime+stime (and, with children, cutime+cstime) of pid in seconds; None when it is gone."""
    try:
        fields = stat_fields(f"/proc/{pid}/stat")
    except OSError:
        return None
    # fields[0] is field 3 (state): utime is field 14 -> index 11
    t = int(fields[11]) + int(fields[12])
    if children:
        t += int(fields[13]) + int(fields[14])
    return t / CLK_TCK


def proc_status(pid, key):
    """A kB value from /proc/<pid>/status (e.g. VmHWM), in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def proc_children(ppid):
    return [pid for pid, fields in all_stats() if int(fields[1]) == ppid]


def postgres_cpu(pm_pid):
    """CPU seconds of the whole PostgreSQL server: the postmaster with its reaped children plus
    every live child (backends, walsenders, checkpointer...)."""
    t = proc_cpu(pm_pid, children=True) or 0.0
    for c in proc_children(pm_pid):
        t += proc_cpu(c) or 0.0
    return t


def relay_ctx_switches(pid):
    """Voluntary + involuntary context switches of all threads of pid."""
    n = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            n += ctx_switches(f"/proc/{pid}/task/{t}/status")
    except OSError:
        pass
    return n


def relay_threads(pid):
    """Per thread of pid, in creation order (the main thread first): CPU seconds and context
    switches (voluntary + involuntary)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return out
    for t in tids:
        try:
            fields = stat_fields(f"/proc/{pid}/task/{t}/stat")
            cs = ctx_switches(f"/proc/{pid}/task/{t}/status")
        except OSError:
            continue
        out.append({"tid": t, "cpu_s": round((int(fields[11]) + int(fields[12])) / tick, 2), "ctx": cs})
    return out


class ForeignMeter:
    """CPU used by processes that are not ours (not descendants of this script), sampled every
    0.5 s from /proc: the benchmark shares the machine, and this says when something else ran.
    Kernel threads are left out; a process that starts and ends between two samples is missed."""

    def __init__(self):
        self.me = os.getpid()
        self.total = 0.0
        self.prev = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.scan()
        self.th = threading.Thread(target=self.loop, name="foreign-cpu", daemon=True)
        self.th.start()

    def scan(self):
        # pid -> (ppid, cpu seconds, start time)
        cur = {pid: (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK, fields[19])
               for pid, fields in all_stats()}
        mine = {}

        def is_mine(pid, depth=0):
            if pid in mine:
                return mine[pid]
            if pid == self.me:
                r = True
            elif pid <= 2 or pid not in cur or depth > 64:
                r = False
            else:
                r = is_mine(cur[pid][0], depth + 1)
            mine[pid] = r
            return r

        delta = 0.0
        for pid, (ppid, cpu, start) in cur.items():
            if ppid == 2 or pid == 2 or is_mine(pid):
                continue
            old = self.prev.get(pid)
            if old is None or old[2] != start:
                delta += cpu if self.prev else 0.0
            else:
                delta += cpu - old[1]
        self.prev = cur
        with self.lock:
            self.total += delta

    def loop(self):
        while not self.stop.wait(0.5):
            try:
                self.scan()
            except Exception:  # noqa: BLE001 - a best-effort gauge
                pass

    def value(self):
        with self.lock:
            return self.total

    def close(self):
        self.stop.set()


FOREIGN = None


class CpuMeter:
    """CPU seconds used by PostgreSQL, nats-server, some of our processes and everything else on
    the machine between two snapshots."""

    def __init__(self, bench):
        self.b = bench

    def snap(self, pids=()):
        return {
            "t": time.monotonic(),
            "pg": postgres_cpu(self.b.pg.proc.pid),
            "nats": proc_cpu(self.b.nats.proc.pid) or 0.0,
            "foreign": FOREIGN.value() if FOREIGN else 0.0,
            "pids": {p: proc_cpu(p) or 0.0 for p in pids},
        }

    @staticmethod
    def delta(a, b):
        return {
            "wall_s": round(b["t"] - a["t"], 3),
            "postgres_cpu_s": round(b["pg"] - a["pg"], 2),
            "nats_server_cpu_s": round(b["nats"] - a["nats"], 2),
            "other_processes_cpu_s": round(b["foreign"] - a["foreign"], 2),
        }


def proc_meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None
