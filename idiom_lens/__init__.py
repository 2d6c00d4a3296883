"""idiom_lens: how transformer language models recall memorized sequences (idioms, facts).

Data flows one way: datasets -> models -> analyses (memorization, trajectory, attribution,
interventions) -> plots/report -> cli. See README.md for a tour.
"""

__version__ = "0.1.0"
