"""Development tools — real service starters, fake GPU trees, process helpers, image builder,
load generator — used by tests, benchmarks and the demo; not part of the wheel.

    devtools.services    etcd and a Docker engine on loopback (EtcdServer, DockerEngine, until)
    devtools.gpu_trees   fake sysfs trees for amdgpu, i915, xe (SysfsTree)
    devtools.agentproc   aivmm-agent as a child process (AgentProcess, Fleet, ROOT)
    devtools.simproc     the sim engine as a child process (SimProcess)
    devtools.schedharness  in-process schedulers fed by a real etcd (Scheduler, publish)
    devtools.observed    a running agent and scheduler, and the metric names they expose
    devtools.image       images FROM scratch out of this interpreter (build_image, build_spec)
    devtools.images      aivmm-agent:local, aivmm-scheduler:local, aivmm-sim (python -m)
    devtools.demo        the local cluster behind ``make demo`` / ``make down`` (python -m)
    devtools.loadgen     a fixed-concurrency aiohttp load generator (drive, Result)
    devtools.stats       percentile()
"""
