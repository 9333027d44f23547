"""The Ray shell: the only folder that imports Ray.

Driver side: ``_service`` (``ShuffleService``: actors, runs, barriers) and
``_placement`` (how many actors a node gets). Actor side: ``_actor``
(``ShuffleActor``, a thin async shell around a ``ShuffleManager``). Task side:
``_transfer`` (what transfer tasks call), ``_client`` (the per-process sender),
``_pool`` (its endpoints), ``_process`` (the one client of a process). ``_handle``
(``RunHandle``) is what the driver gives tasks about a run.
"""
