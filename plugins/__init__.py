"""Plugins shipped with tsproxy. Each imports only ``tsproxy.api``; list one in plugin.config by
module name (``plugins.stats_over_http``) or by path."""
