"""Task mixin: a resumed training run sees the batches an uninterrupted one would.

fairseq (``main``, so ``fairseq-fixed``; 0.12.2 seeded with ``--seed`` alone) groups the training
sentences into batches once per iterator, with numpy seeded by ``--seed`` plus the epoch the
iterator starts at, caches the iterator, and then only reshuffles the order of those batches every
epoch. A fresh run builds them at epoch 1; a run resumed in epoch 5 builds them with another seed,
so every later update trains on other sentence groupings than the same run left alone would
(measured: the first update after a resume already had another batch, and the losses drifted apart
from there). A long run interrupted once is then not the run it claims to be.

So when the THOR bilingual task creates the training iterator at a later epoch (a resume), it builds
the batches as a run that started at epoch 1 did and hands the iterator the epoch it resumes at
(fairseq then restores its position inside that epoch from the checkpoint). The iterator fairseq
has cached is returned untouched (its epoch advances by itself). Data split into shards
(``data1:data2``), where fairseq loads another dataset each epoch, iterators fairseq does not cache
(it rebuilds them every epoch, resumed or not) and ``rebuild_batches`` are left as fairseq makes them.
"""
from fairseq.data.iterators import EpochBatchIterator


class BatchesAsIfFromEpochOne:
    def get_batch_iterator(self, dataset, **kwargs):
        epoch = kwargs.get("epoch", 1)
        cached = (not kwargs.get("disable_iterator_cache") and not kwargs.get("update_epoch_batch_itr")
                  and self.can_reuse_epoch_itr(dataset))
        if (epoch <= 1 or not cached or dataset in self.dataset_to_epoch_iter or kwargs.get("rebuild_batches")
                or dataset is not self.datasets.get(self.cfg.train_subset)
                or self.has_sharded_data(self.cfg.train_subset)):
            return super().get_batch_iterator(dataset, **kwargs)
        iterator = super().get_batch_iterator(dataset, **{**kwargs, "epoch": 1})
        dataset.set_epoch(epoch)  # what fairseq would have told the dataset
        if isinstance(iterator, EpochBatchIterator):
            iterator.epoch = epoch  # the epoch shuffles the batch order, as in an uninterrupted run
        return iterator
