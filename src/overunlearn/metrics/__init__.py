"""Metrics: task metrics and privacy metrics (MIA, U-LiRA, KLoM) as pure functions."""
