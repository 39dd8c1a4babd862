"""Audit of the KL settings of RL libraries: which gradient do a library's flags give?

* ``analysis``  a library's KL terms (``KLSetting`` + aggregation) through the exact toy analysis: expected gradient
                named in docs/contract.md §4's terms, relative bias, variance; Monte Carlo for a group std;
* ``registry``  TRL (GRPO, RLOO), verl, OpenRLHF, NeMo-RL: flags → terms, each citing the source it was read from;
* ``cli``       ``python -m kl_lib.audit``.

Layer: beside ``kl_lib.toy`` (imports the core and ``kl_lib.toy`` only).
"""
