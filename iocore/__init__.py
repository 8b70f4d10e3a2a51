"""iocore: the event system, network and records layers of tsproxy (after ATS's iocore/).

Layers import downward only: net -> eventsystem -> records.
"""
