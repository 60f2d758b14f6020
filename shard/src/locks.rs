//! Per-chunk writer serialization.
//!
//! Writes and deletes of one chunk must reach the index in generation order
//! and read-modify-write must see the previous write's result, so they run one
//! at a time per chunk. Different chunks never wait for each other (that is
//! what lets group commit group). An entry lives only while someone holds or
//! waits for it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::sem::{Permit, Semaphore};
use shardstore_proto::ChunkId;

use crate::error::ShardError;

#[derive(Default)]
pub struct ChunkLocks {
    map: RefCell<HashMap<ChunkId, Rc<Semaphore>>>,
}

pub struct ChunkGuard<'a> {
    locks: &'a ChunkLocks,
    chunk: ChunkId,
    sem: Rc<Semaphore>,
    permit: Option<Permit<Rc<Semaphore>>>,
}

impl Drop for ChunkGuard<'_> {
    fn drop(&mut self) {
        self.permit.take();
        // The map and this guard: nobody else holds or waits for the lock.
        if Rc::strong_count(&self.sem) == 2 {
            self.locks.map.borrow_mut().remove(&self.chunk);
        }
    }
}

impl ChunkLocks {
    pub async fn lock(&self, chunk: ChunkId) -> Result<ChunkGuard<'_>, ShardError> {
        let sem = self
            .map
            .borrow_mut()
            .entry(chunk)
            .or_insert_with(|| Rc::new(Semaphore::new(1)))
            .clone();
        // The guard exists before the wait, so a cancelled waiter cleans up too.
        let mut guard = ChunkGuard {
            locks: self,
            chunk,
            sem,
            permit: None,
        };
        let permit = guard
            .sem
            .acquire_rc_permit(1)
            .await
            .map_err(|e| ShardError::Internal(format!("chunk lock closed: {e}")))?;
        guard.permit = Some(permit);
        Ok(guard)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_test;
    use std::rc::Rc;

    #[test]
    fn serializes_per_chunk_and_cleans_up() {
        run_test(async {
            let locks = Rc::new(ChunkLocks::default());
            let order = Rc::new(RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            for i in 0..4u32 {
                let locks = locks.clone();
                let order = order.clone();
                tasks.push(glommio::spawn_local(async move {
                    let _g = locks.lock(ChunkId(1)).await.unwrap();
                    order.borrow_mut().push((i, "in"));
                    glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                    order.borrow_mut().push((i, "out"));
                }));
            }
            // Another chunk is not blocked by chunk 1.
            let other = locks.lock(ChunkId(2)).await.unwrap();
            drop(other);
            for t in tasks {
                t.await;
            }
            let order = order.borrow();
            for pair in order.chunks(2) {
                assert_eq!(
                    pair[0].0, pair[1].0,
                    "critical sections interleaved: {order:?}"
                );
            }
            assert_eq!(locks.len(), 0);
        });
    }
}
