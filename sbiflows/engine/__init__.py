"""The simulation engine behind :func:`sbiflows.simulate`: jobs, worker processes, backends, the store.

* :mod:`~sbiflows.engine.jobs` -- one unit of work and how it runs (seeding, output checks);
* :mod:`~sbiflows.engine.sandbox` -- a worker process that can be killed (timeouts, crashes);
* :mod:`~sbiflows.engine.backends` -- in-process, local workers, ``concurrent.futures``, Dask;
* :mod:`~sbiflows.engine.driver` -- the loop: chunks out, outcomes back, retries, the store;
* :mod:`~sbiflows.engine.store` -- the resumable zarr store;
* :mod:`~sbiflows.engine.names` -- the simulator name a store records, and which names match;
* :mod:`~sbiflows.engine.progress` -- a bar in terminals, plain lines in logs.
"""
