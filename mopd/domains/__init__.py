"""Verifiable domains: synthetic generators, a registry, and real-data loaders.

``generate(domain, n, seed)`` and ``load_records(domain, source)`` both return records
``{"id", "domain", "prompt", "completion", "reference"}`` (all strings); score a response with
``mopd.verifiers.verify(get_domain(domain).verifier, response, record["reference"])``.
"""

from mopd.domains.loaders import DataSource, load_records
from mopd.domains.registry import DOMAINS, VERIFIER_KINDS, Domain, generate, get_domain

__all__ = ["DOMAINS", "VERIFIER_KINDS", "DataSource", "Domain", "generate", "get_domain",
           "load_records"]
