"""The router: the public Generate endpoint over a set of workers.

``policy`` picks a worker, ``link`` keeps one coalescing ``Worker.Serve`` stream per
worker, ``cluster`` ties them with admission and failover, ``service`` / ``server``
expose it over gRPC, ``cli`` is ``llmcluster router``. Never imports torch.
"""
