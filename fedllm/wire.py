"""Keys that cross the wire between sites and the server, defined once.

Only adapter tensors (under ``ARRAYS``) and these numeric metrics leave a site, plus the site's
own name (``SITE``/``SITE_NAME``), which the coordinator knows anyway. Never text, token ids,
file paths or per-example values. Which of the metrics carry a value computed on the site's
records is the site's own setting (``release-metrics``, :mod:`fedllm.site.metric_release`); a
metric a site does not release is sent as -1 ("not defined"), and ``METRICS_RELEASE`` says which
setting the site applied (``RELEASE_CODES``).
"""

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
SITE = "site"
SITE_NAME = "name"

# server -> site (train/evaluate config)
SERVER_ROUND = "server-round"
RUN_ID = "run-id"  # the run's name in the sites' ledgers (kept across fedllm run --resume)
PROXIMAL_MU = "proximal-mu"

# site -> server (train metrics)
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
LOCAL_STEPS = "local-steps"
EXAMPLES_SEEN = "examples-seen"
TOKENS = "tokens"
TRAIN_SECONDS = "train-seconds"
EPSILON = "epsilon"
DELTA = "delta"  # the site's own δ: its ε (EPSILON) is at this δ
EPSILON_CAP = "epsilon-cap"  # the cap the site enforces (its max-epsilon, tightened by the run's when smaller)
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
MAX_GRAD_NORM = "max-grad-norm"
METRICS_RELEASE = "metrics-release"  # train and evaluate: the site's release-metrics, as RELEASE_CODES

# site -> server (evaluate metrics)
EVAL_LOSS = "eval-loss"
PERPLEXITY = "perplexity"
EVAL_TOKENS = "eval-tokens"

# site -> server (evaluate metrics, optional): the run's task metrics (``[evaluate] metrics``), each a
# mean over the scored held-out records in [0, 1], and how many records were scored
EXACT_MATCH = "exact-match"
CHOICE = "choice"
ROUGE_L = "rouge-l"
TASK_METRIC_KEYS = (EXACT_MATCH, CHOICE, ROUGE_L)
TASK_EXAMPLES = "task-examples"
OPTIONAL_EVALUATE_KEYS = (*TASK_METRIC_KEYS, TASK_EXAMPLES)

TRAIN_METRIC_KEYS = (
    NUM_EXAMPLES, TRAIN_LOSS, LOCAL_STEPS, EXAMPLES_SEEN, TOKENS, TRAIN_SECONDS,
    EPSILON, DELTA, EPSILON_CAP, NOISE_MULTIPLIER, SAMPLE_RATE, MAX_GRAD_NORM, METRICS_RELEASE,
)
EVALUATE_METRIC_KEYS = (NUM_EXAMPLES, EVAL_LOSS, PERPLEXITY, EVAL_TOKENS, METRICS_RELEASE)
RELEASE_CODES = {"exact": 0, "dp": 1, "none": 2}  # site's release-metrics -> the METRICS_RELEASE value

# Error code a site uses to refuse a round that would cross its privacy cap. Flower's own codes
# are 0-8; anything else is a failure (a crash, a timeout) and counts against
# federation.tolerated-failures.
BUDGET_REFUSED = 1001
# Error code a site uses to refuse a run whose configuration is outside its privacy policy (a larger
# δ than the site's, DP off while the site requires it, a cap it cannot honour): a refusal, not a failure.
POLICY_REFUSED = 1002
REFUSAL_CODES = (BUDGET_REFUSED, POLICY_REFUSED)
