"""The empirical privacy audit: canaries planted in a site's data, their scoring, and the one-run
ε lower bound (``canaries``, ``scoring``, ``empirical``). Its report text is in ``fedllm.reports``."""
