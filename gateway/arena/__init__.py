"""The arena: anonymous battles, their votes and the leaderboard."""
