"""Configuration: the run config (:mod:`.run`, set by the federation operator), the site schema
(:mod:`.site`, each site's own settings) and TOML in and out (:mod:`.toml`). Imports the standard
library, ``tomli_w`` and ``fedllm.data.loading``'s column-mapping check only."""

from fedllm.config.run import (
    CHOICES,
    RANGES,
    CentralDPConfig,
    DataConfig,
    FederationConfig,
    LoraConfig,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    Scalar,
    SimulationConfig,
    StrategyConfig,
    TrainConfig,
    defaults_flat,
    load_run_overrides,
    parse_set_option,
    to_toml,
)
from fedllm.config.site import (
    SITE_DEFAULTS,
    SITE_KEYS,
    SITE_NAME_RE,
    SITE_PATH_KEYS,
    SiteConfig,
    site_problems,
    validate_site,
)
from fedllm.config.toml import flatten, read_toml, toml_text, toml_value

__all__ = [
    "CHOICES",
    "RANGES",
    "SITE_DEFAULTS",
    "SITE_KEYS",
    "SITE_NAME_RE",
    "SITE_PATH_KEYS",
    "CentralDPConfig",
    "DataConfig",
    "FederationConfig",
    "LoraConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "Scalar",
    "SimulationConfig",
    "SiteConfig",
    "StrategyConfig",
    "TrainConfig",
    "defaults_flat",
    "flatten",
    "load_run_overrides",
    "parse_set_option",
    "read_toml",
    "site_problems",
    "to_toml",
    "toml_text",
    "toml_value",
    "validate_site",
]
