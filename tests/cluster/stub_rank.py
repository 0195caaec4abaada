"""A stand-in for the trainer in the rendered sbatch script (invoked as ``<this> -m
dist_llm.cli.main train <overrides>``): it exercises the Slurm half of the preemption loop
without the training spine. Each rank records what it saw; on SIGUSR1 rank 0 requeues the job
with :func:`requeue_current_job` and every rank exits with EXIT_PREEMPTED; after a restart the
ranks exit 0. Only the test of the signal chain uses it.
"""
import json
import os
import signal
import socket
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from dist_llm.launch.env import EXIT_PREEMPTED, read_launch_env  # noqa: E402
from dist_llm.launch.slurm_requeue import requeue_current_job  # noqa: E402


def main() -> int:
    ov = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    le = read_launch_env()
    run_dir = os.path.join(ov["output_dir"], f"{ov['name']}-{le.job_id}")
    os.makedirs(run_dir, exist_ok=True)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    flag = []
    signal.signal(signal.SIGUSR1, lambda s, f: flag.append("USR1"))
    signal.signal(signal.SIGTERM, lambda s, f: flag.append("TERM"))

    # rank 1 connects to rank 0 through MASTER_ADDR:MASTER_PORT (node2 -> node1)
    peer = None
    if le.world_size == 2:
        if le.rank == 0:
            srv = socket.socket()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((le.master_addr, le.master_port))
            srv.listen(1)
            conn, _ = srv.accept()
            peer = conn.recv(100).decode()
            conn.close()
            srv.close()
        else:
            for _ in range(400):
                try:
                    c = socket.create_connection((le.master_addr, le.master_port))
                    break
                except OSError:
                    time.sleep(0.05)
            c.sendall(f"rank{le.rank}@{os.environ.get('SLURMD_NODENAME')}".encode())
            c.close()

    rec = {"rank": le.rank, "world": le.world_size, "restart": restart, "node": os.environ.get("SLURMD_NODENAME"),
           "master": f"{le.master_addr}:{le.master_port}", "peer": peer, "launcher": le.launcher}
    if restart == 0:
        open(os.path.join(run_dir, f"ready.{le.rank}"), "w").close()
        end = time.time() + 120
        while not flag and time.time() < end:
            time.sleep(0.05)
        rec["signal"] = flag[:1]
        if le.rank == 0:
            rec["requeued"] = requeue_current_job()
        with open(os.path.join(run_dir, f"rank{le.rank}.restart{restart}.json"), "w") as f:
            json.dump(rec, f)
        return EXIT_PREEMPTED
    with open(os.path.join(run_dir, f"rank{le.rank}.restart{restart}.json"), "w") as f:
        json.dump(rec, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
