"""What runs on the compute node: the resumable job wrapper submitit pickles.

What happens on the node (`ClusterJob.__call__`):
  * torch.distributed's env:// variables are exported for multi-task jobs (submitit's
    TorchDistributedEnvironment); rank and world size then come from `bonnerlab.distributed` only;
  * STATE markers RUNNING -> DONE | FAILED in the run folder (the job writes them, not the
    launcher);
  * SIGTERM (preemption, scancel) and SIGUSR2 (submitit's "time limit is near") only set
    `bonnerlab.interrupt`'s flag; `train` saves `latest.pt` at the next step boundary and returns;
  * after a SIGUSR2 save, submitit's own handler runs `checkpoint()` and `scontrol requeue`s the
    job; after a SIGTERM save, SLURM itself requeues (preemption) or cancels the job, so the
    process waits to be killed instead of reporting a result that is not final;
  * every start resumes from `latest.pt` when it exists: on this SLURM a preempted job restarts from
    its original submission without `checkpoint()` ever being called;
  * `max_requeues` bounds the loop through `SLURM_RESTART_COUNT`.
Submission (the login-node side) is bonnerlab/cluster/submit.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from bonnerlab.cluster.registry import JOBS


def _write_state(run_dir: Path, state: str) -> None:
    from bonnerlab.errors import DiskSpaceError
    from bonnerlab.runs import write_state

    if state != "FAILED":
        write_state(run_dir, state)
        return
    # written while an error is on its way out: where the disk is full, that error says so
    with contextlib.suppress(OSError, DiskSpaceError):
        write_state(run_dir, state)


def _held_by_another(error: BaseException) -> bool:
    """The run folder's LOCK is another live process's: its STATE is that process's to write."""
    from bonnerlab.errors import FolderInUseError

    return isinstance(error, FolderInUseError)


def export_distributed_env(gpus_per_node: int) -> None:
    """torch.distributed env:// variables for this submitit task (no-op for a single task).

    Works for SLURM and for the local executor's tasks. submitit seeds MASTER_PORT from the job
    id, so two jobs on one node do not collide. Device mapping is left to
    `bonnerlab.distributed` (cuda:LOCAL_RANK among the visible GPUs): submitit's
    CUDA_VISIBLE_DEVICES=local_rank would name the wrong physical GPU whenever SLURM gave this job
    GPUs other than 0..n-1.
    """
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    try:
        job_env = submitit.JobEnvironment()
        num_tasks, num_nodes = job_env.num_tasks, job_env.num_nodes
    except RuntimeError:  # not inside a submitit job (the debug executor)
        return
    if num_tasks <= 1:
        return
    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        from bonnerlab.distributed import node_address

        os.environ["MASTER_ADDR"] = node_address(env.master_addr)
    per_node = num_tasks // num_nodes
    if gpus_per_node:
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        if per_node > len(visible):
            raise RuntimeError(
                f"{per_node} tasks per node (SLURM_NTASKS_PER_NODE="
                f"{os.environ.get('SLURM_NTASKS_PER_NODE', '?')}) but {len(visible)} GPUs visible "
                f"(CUDA_VISIBLE_DEVICES={','.join(visible)}): one task per GPU is required"
            )


def rank_after_export(gpus_per_node: int) -> int:
    """This task's rank, resolved once by bonnerlab.distributed after the env:// export."""
    from bonnerlab.distributed import resolve_env

    export_distributed_env(gpus_per_node)
    return resolve_env()[0]


class ClusterJob:
    """The callable submitit pickles and runs on the node: one job in its run folder, resumable.

    A `submitit.helpers.Checkpointable` in spirit: `checkpoint()` returns a DelayedSubmission of
    the same job, which resumes from the run folder's `latest.pt`.
    """

    def __init__(
        self, kind: str, cfg: Any, run_dir: str, max_requeues: int = 3, gpus_per_node: int = 0
    ):
        self.kind = kind
        self.cfg = cfg
        self.run_dir = str(run_dir)
        self.max_requeues = max_requeues
        self.gpus_per_node = gpus_per_node

    def __call__(self) -> dict[str, Any]:
        from bonnerlab import interrupt

        # a fatal signal prints the Python stack into the task's log
        interrupt.enable_crash_stacks()
        run_dir = Path(self.run_dir)
        rank = rank_after_export(self.gpus_per_node)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts > self.max_requeues:
            if rank == 0:
                _write_state(run_dir, "FAILED")
            raise RuntimeError(
                f"requeued {restarts} times, more than max_requeues={self.max_requeues}"
            )

        interrupt.reset()
        previous = interrupt.install_handlers()
        threads = os.environ.get("SLURM_CPUS_PER_TASK")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        if rank == 0:
            import bonnerlab

            _write_state(run_dir, "RUNNING")
            print(
                f"[bonnerlab] {self.kind} job in {run_dir}: restart {restarts}, code from "
                f"{Path(bonnerlab.__file__).parent}",
                flush=True,
            )
        try:
            try:
                result = JOBS[self.kind].load_function()(self._resumable_config())
            except BaseException as e:
                if rank == 0 and not interrupt.received() and not _held_by_another(e):
                    _write_state(run_dir, "FAILED")
                raise
            if isinstance(result, dict) and result.get("interrupted"):
                if interrupt.received()[-1:] == [signal.SIGINT]:
                    return result  # the user's own stop (scancel -s INT): saved, nothing to wait on
                self._stop_after_save(
                    run_dir, rank, interrupt.received(), previous.get(signal.SIGUSR2)
                )
            if rank == 0:
                _write_state(run_dir, "DONE")
            return result
        finally:
            # the debug executor runs jobs inside the launcher: give its handlers back
            interrupt.restore_handlers(previous)
            if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
                # The result is final. SLURM sends the time-limit signal up to a minute early, so
                # it can land after training: submitit's handler would requeue a finished job,
                # and during interpreter shutdown (handlers reset to default) it kills the
                # process, turning a COMPLETED job into FAILED. SIG_IGN survives shutdown.
                signal.signal(signal.SIGUSR2, signal.SIG_IGN)

    def _resumable_config(self) -> Any:
        spec = JOBS[self.kind]
        if spec.resume_field is None:
            return self.cfg
        from bonnerlab.config import apply_overrides

        return apply_overrides(self.cfg, {spec.resume_field: True})

    def _stop_after_save(
        self, run_dir: Path, rank: int, received: list[int], submitit_handler: Any
    ) -> None:
        """latest.pt is saved: hand over to whoever asked us to stop. Never returns."""
        if received and received[-1] == signal.SIGUSR2 and callable(submitit_handler):
            # time limit near: submitit calls self.checkpoint(), `scontrol requeue`s this job and
            # exits (rank 0); other ranks return from it and are killed by the requeue. When
            # submitit refuses (too many timeouts) it raises, and the job ends FAILED.
            try:
                submitit_handler(signal.SIGUSR2, None)
            except Exception:
                if rank == 0:
                    _write_state(run_dir, "FAILED")
                raise
        # SIGTERM: SLURM is preempting (it requeues the job itself) or cancelling it. Returning
        # would report a result that is not final, so wait for the SIGKILL that follows.
        print(
            f"[bonnerlab] saved after signal {received}; waiting for SLURM to stop this task",
            flush=True,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(1)
        raise RuntimeError("stopped by a signal but never killed or requeued")

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on SIGUSR2: resubmit the same job; it resumes from latest.pt."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(
            type(self)(self.kind, self.cfg, self.run_dir, self.max_requeues, self.gpus_per_node)
        )
