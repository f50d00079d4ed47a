"""QRNCA itself: IG attribution (``ig``), selection (clusters, ICA, common neurons), the resumable run (``locate``), its directory (``store``) and executors.

It imports ``engine/``, ``data/``, ``model/`` and the root modules."""
