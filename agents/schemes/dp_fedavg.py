"""Client-level differentially private FedAvg (DP-FedAvg): the paper's preset of the privacy wrapper.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models", ICLR
2018. FedAvg with one vote per institution (uniform weighting), wrapped in client-level DP
(:class:`agents.wrappers.privacy.ClientDP`: Poisson-sampled cohorts of ``cohort_fraction``,
changes clipped to ``clip_norm``, Gaussian noise at the coordinator, epsilon from dp-accounting).
``scheme=fedavg privacy=client_dp`` is the same mechanism around any averaging scheme; this preset
keeps the paper's name and its keys under ``scheme.``.
"""

from __future__ import annotations

from agents.schemes.base import register
from agents.schemes.fedavg import FedAvg
from agents.wrappers.privacy import ClientDP


@register("dp_fedavg")
class DPFedAvg(ClientDP):
    """DP-FedAvg (McMahan et al. 2018): FedAvg with one vote per institution, under client-level DP."""

    prefix = "scheme"  # its privacy keys are the scheme's own (scheme.clip_norm, scheme.target_epsilon, ...)

    def __init__(self, *, cohort_fraction: float = 1.0, server_lr: float = 1.0, **privacy):
        super().__init__(FedAvg(weighting="uniform", cohort_fraction=cohort_fraction, server_lr=server_lr), **privacy)
