"""The pure hot path: transitions in, Attentive user records out (phones, emails, dates, values).

May import: ``worker.setup.jobconfig`` (the mapping compiles a job configuration). No Redis, no HTTP.
Modules: transitions (input), mapper (records), values, phones, emails, reasons (codes and limits).
"""
