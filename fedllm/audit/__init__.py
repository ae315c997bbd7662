"""The empirical privacy audit: canaries planted in a site's data, their scoring, and the one-run
ε lower bound. ``canaries``: the canary sets, the verdict and the command; ``canary_run``: one
audit run (train, score, report); ``scoring``: log-likelihoods of codes and responses;
``empirical``: the statistics. Its report text is in ``fedllm.reports``."""
