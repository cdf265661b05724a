"""framekv's Python API: questions and searches against an index built by `framekv ingest`.

    from framekv import Index
    index = Index("s3://bucket/idx")                 # or a local folder
    result = index.ask("what colour is the star ?")  # the whole library; video=... for one
    print(result.text, [e.time for e in result.evidence])
    moments = index.search("a red circle", top=5)
    ranked = index.rank("when does the red star appear ?")  # the library's videos, best first

The implementation lives in pipeline/query.py; this package only names what callers use.
"""

from pipeline.query import (AskResult, Evidence, Index, IndexedVideo, IndexNotFound, Moment, QueryError,
                            RankedVideo, ReadStats, VideoNotFound)

__all__ = ["AskResult", "Evidence", "Index", "IndexNotFound", "IndexedVideo", "Moment", "QueryError", "RankedVideo",
           "ReadStats", "VideoNotFound"]
