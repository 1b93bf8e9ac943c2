"""The box's kernel concerns, one module each (docs/architecture.md,
"One module per kernel concern"): ``userns``, ``mounts``, ``cgroups``, ``rlimits``, ``caps``,
``descriptors``, ``uts``, ``network``, ``pidns``, ``seccomp`` (and ``treelimits``, init's
sampling without a cgroup). A ``child_`` function runs in the box's processes after ``fork``,
through :class:`sandbox.kernel.KernelOps`; every other function runs in the supervisor.
:mod:`sandbox.child` says which process runs which ``child_`` step, in which order."""
