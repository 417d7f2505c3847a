"""Tests against real middleboxes: nginx as a reverse proxy, squid as a forward proxy."""
