"""The study and report layer: reading finished runs, statistics, findings, figures, the report page and the
notebook runner.

* ``runs``      a directory of RL runs as one long table of metrics;
* ``tables``    per-run results with their evaluation, per-problem scores, checkpoint tables;
* ``stats``     bootstrap intervals and tests;
* ``findings``  the study's pre-stated findings and their verdicts;
* ``figures``   the shared figure style, one colour per configuration, atomic figure saving, training curves;
* ``site``      the browsable report (``runs/report/index.html``);
* ``nbrun``     the papermill notebook runner behind ``make reproduce``.

Layer: the top one; may import everything below (core, toy, lm, tasks, rl).
"""
