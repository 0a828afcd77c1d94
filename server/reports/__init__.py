"""Reports a privacy or compliance officer reads and signs: each site's privacy spend per run
and over its lifetime (:mod:`fedface.server.reports.privacy`), rendered as JSON, Markdown, CSV
or one standalone HTML file (:mod:`fedface.server.reports.render`)."""

from fedface.server.reports.privacy import privacy_report_for_ledger, privacy_report_for_run
from fedface.server.reports.sections import SCHEMA

__all__ = ["SCHEMA", "privacy_report_for_ledger", "privacy_report_for_run"]
