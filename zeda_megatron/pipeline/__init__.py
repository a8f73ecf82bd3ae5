"""One phase pipeline for the embedded demo and the Slurm job.

A phase is declared once (:class:`phases.Phase`: its command, the files it reads and writes, the
identity that decides its result, how it is launched) and judged by one completion rule
(:mod:`state`: a marker carrying the phase's fingerprint, its outputs present, and for a training stage
the status file the trainer writes when it ends). Two runners execute a list of phases in order:

* :mod:`local` runs them on this machine (``python -m zeda_megatron.demo``): torchrun or a plain process
  per phase, or an in-process call;
* the Slurm job (``sbatch slurm/adapt_glm.sh``) runs them under ``srun`` (:mod:`launch`): the batch shell
  asks :mod:`slurm` what to run next and how the last phase ended (``python3 -m zeda_megatron.pipeline
  next``), and requeues only when :func:`zeda_megatron.training.signals.requeue_decision` says so.

The bookkeeping modules (phases, state, launch, overrides, report, slurm and the command line) use the
standard library only: the batch shell runs them with the node's ``python3`` before the project's
environment (a venv or a container) is known. The modules that need the project's stack (:mod:`job`:
the Slurm job's phases from its Hydra overrides; :mod:`envcheck`) import it inside their functions.
"""
