"""valuenet: prefix value heads V(x, yᵗ) for controlled decoding (CD-FUDGE, CD-Q).

Not built yet: the model, rollout data and offline trainer land with the valuenet issue. The
server will expose trained heads as scorers `value:NAME`, usable by speculative rejection.
"""
