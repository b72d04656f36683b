"""Learning and serving side: rankers, the recommendation writer and the reader client."""

from online.ranker import RecList, Recommendation, SimpleRanker
from online.reader import RecommendationReader
from online.writer import RecommendationWriter

__all__ = ["RecList", "Recommendation", "RecommendationReader", "RecommendationWriter", "SimpleRanker"]
