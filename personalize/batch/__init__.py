"""`personalize batch`: DreamBooth over many subjects (x bases x methods) in one command.

`planning` decides the jobs and checks the flags, `run` trains them, `summary` reports them.

- Each base is loaded from disk once per process and reused for every subject and method
  (`LoadedBase.reset` restores its pristine weights between them).
- Resumable: a finished subject is skipped, an interrupted one resumes from its last checkpoint;
  since every run is deterministic in its seed, a killed-and-rerun batch ends with the same
  weights as an uninterrupted one. A rerun with flags that change the weights is refused.
- Failure-isolated: a subject that fails (bad photos, NaN loss, out of memory) is recorded with its
  error and the batch goes on; the exit code is non-zero at the end. A rerun retries it.
- Sharded (`--shard i/n`, or one shard per process under `accelerate launch`, each process
  training on its own GPU): shard i takes the i-th contiguous slice of the grid ordered by class,
  so subjects that share class images mostly train in one process, one after another, and each
  process loads few bases. Shards never share work and need no coordination: the summary is
  rebuilt from what is on disk (under a file lock), so the shard that finishes last writes the
  complete one, and rerunning the command rebuilds it.
"""

from __future__ import annotations

from .planning import (BATCH_JSON, RERUN_MAY_CHANGE, STATUS_DIR, Job, check_inputs, default_batch_dir,
                       launcher_shard, parse_shard, plan, select_subjects, shard_jobs, split_list)
from .run import describe_error, evaluator, run_batch
from .summary import SUMMARY_JSON, SUMMARY_MD, exit_code, job_status, print_summary, summary_markdown, write_summary

__all__ = ["BATCH_JSON", "RERUN_MAY_CHANGE", "STATUS_DIR", "SUMMARY_JSON", "SUMMARY_MD", "Job", "check_inputs",
           "default_batch_dir", "describe_error", "evaluator", "exit_code", "job_status", "launcher_shard",
           "parse_shard", "plan", "print_summary", "run_batch", "select_subjects", "shard_jobs", "split_list",
           "summary_markdown", "write_summary"]
