"""Start the captioning processes of one node, as generate.sh does: a plain launcher, since they never talk.

    python utils/launch.py --nproc 8 [--nnodes 2 --node-rank 1] -- python qwen.py --input-json in.json ...

Process i of this node gets LOCAL_RANK=i, RANK=NODE_RANK*NPROC+i and WORLD_SIZE=NPROC*NNODES, the variables
the model scripts read (no rendezvous: MASTER_ADDR and MASTER_PORT are not needed). SIGTERM and SIGINT are
passed on to every process, which finish their batch and stop; a second one stops them at once. The
processes run in their own sessions, so that a Ctrl-C in the terminal reaches them once, through here. A
process that fails does not stop the others (their shards are independent); the launcher waits for all and
exits with 128 + the signal when it was signalled, else with the status of the lowest failing rank, which
it names on one line.
"""
import argparse
import os
import signal
import subprocess
import sys


def rank_environment(local_rank, nproc, nnodes, node_rank):
    """The variables the model scripts read (torchrun's names), and OMP_NUM_THREADS=1 unless set, as torchrun
    sets it where several processes share the node's cores."""
    env = {"OMP_NUM_THREADS": "1"} if nproc > 1 else {}
    env.update(os.environ)
    env.update(LOCAL_RANK=str(local_rank), RANK=str(node_rank * nproc + local_rank), WORLD_SIZE=str(nproc * nnodes),
               LOCAL_WORLD_SIZE=str(nproc))
    return env


class Ranks:
    """This node's processes, and the signal that asked them to stop."""

    def __init__(self):
        self.processes, self.stop_signal, self.signalled, self.first_rank = [], None, 0, 0
        signal.signal(signal.SIGTERM, self.forward)
        signal.signal(signal.SIGINT, self.forward)

    def forward(self, signum, frame):
        self.stop_signal = self.stop_signal or signum
        self.signalled = len(self.processes)
        for process in self.processes:
            try:
                process.send_signal(signum)
            except ProcessLookupError:
                pass  # already gone

    def start(self, command, nproc, nnodes, node_rank):
        self.first_rank = node_rank * nproc
        for local_rank in range(nproc):
            if self.stop_signal:
                break  # asked to stop while starting: start no more
            env = rank_environment(local_rank, nproc, nnodes, node_rank)
            self.processes.append(subprocess.Popen(command, env=env, start_new_session=True))
            if self.stop_signal and self.signalled < len(self.processes):  # the signal came while it started
                self.forward(self.stop_signal, None)

    def wait(self):
        """Wait for every process; the exit status of the launcher."""
        statuses = [process.wait() for process in self.processes]
        stopped = {128 + self.stop_signal, -self.stop_signal} if self.stop_signal else set()
        failed = [(self.first_rank + local_rank, status) for local_rank, status in enumerate(statuses)
                  if status and status not in stopped]
        for rank, status in failed:
            how = f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
            print(f"launch.py: rank {rank} {how}", file=sys.stderr, flush=True)
        if self.stop_signal:
            return 128 + self.stop_signal
        if failed:
            status = failed[0][1]
            return 128 - status if status < 0 else status
        return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, required=True, help="processes on this node (one per GPU)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in the run")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's number, 0 to NNODES-1")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command of every process")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.nproc < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        parser.error("needs --nproc >= 1, 0 <= --node-rank < --nnodes, and a command after --")
    ranks = Ranks()
    ranks.start(command, args.nproc, args.nnodes, args.node_rank)
    sys.exit(ranks.wait())


if __name__ == "__main__":
    main()
