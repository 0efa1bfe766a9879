//! Lookups that reach Redis together travel together: the `GET`s that Checks start in one turn
//! of the scheduler leave as one pipeline, in one write, and Redis answers them in one read.
//! Without it every Check's lookup was a write of its own on both ends of the connection and a
//! wake-up of Redis, which is most of what a Redis hit costs when Redis shares the core.
//!
//! Only where every key goes to the same server (one server, or the master Sentinel names): a
//! cluster pipeline must stay within one slot, so there each lookup is a command of its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Value;
use tokio::sync::oneshot;

use super::CacheError;
use super::connection::Connection;

/// What one lookup gets back: the value of each of its keys, in order.
pub type Values = Vec<Option<Vec<u8>>>;

/// The lookups waiting for the next pipeline.
pub struct Batcher {
    connection: Connection,
    /// Bounds a pipeline's life; each lookup is also bounded by its own caller.
    timeout: Duration,
    waiting: Mutex<Vec<Waiting>>,
}

struct Waiting {
    names: Vec<String>,
    reply: oneshot::Sender<Result<Values, CacheError>>,
}

impl Batcher {
    pub fn new(connection: Connection, timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            connection,
            timeout,
            waiting: Mutex::new(Vec::new()),
        })
    }

    /// The values of `names` (one lookup: one token's key under each secret), fetched in the
    /// next pipeline. Nothing is queued until the future is first polled.
    pub async fn get(self: &Arc<Self>, names: Vec<String>) -> Result<Values, CacheError> {
        let (reply, answer) = oneshot::channel();
        let first = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            waiting.push(Waiting { names, reply });
            waiting.len() == 1
        };
        if first {
            tokio::spawn(Arc::clone(self).send());
        }
        // The pipeline's task always answers, unless the runtime is shutting down.
        answer.await.unwrap_or(Err(CacheError::Timeout))
    }

    /// Sends everything queued once the lookups runnable now have joined, and answers each.
    /// The queue is owed from the moment the task is made, before it first runs.
    fn send(self: Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let pending = Pending {
            batcher: self,
            taken: false,
        };
        async move {
            // Checks woken together run before this task does: their lookups join the
            // pipeline.
            tokio::task::yield_now().await;
            let (this, batch) = pending.take();
            this.pipeline(batch).await;
        }
    }

    async fn pipeline(&self, batch: Vec<Waiting>) {
        let mut pipeline = redis::pipe();
        // A key someone made a list or a hash fails its own lookup, not the whole pipeline.
        pipeline.ignore_errors();
        for waiting in &batch {
            match waiting.names.as_slice() {
                [name] => pipeline.get(name),
                names => pipeline.mget(names),
            };
        }
        let mut connection = self.connection.clone();
        let sent = tokio::time::timeout(
            self.timeout,
            pipeline.query_async::<Vec<Value>>(&mut connection),
        )
        .await;
        let values = match sent {
            Ok(Ok(values)) if values.len() == batch.len() => values,
            Ok(Ok(_)) => return answer_all(batch, CacheError::Redis(redis::ErrorKind::Parse)),
            Ok(Err(error)) => return answer_all(batch, CacheError::from(error)),
            Err(_) => return answer_all(batch, CacheError::Timeout),
        };
        for (waiting, value) in batch.into_iter().zip(values) {
            let _ = waiting.reply.send(decode(value, waiting.names.len()));
        }
    }
}

/// The queue a batch task owes a pipeline. Should the task end before taking it (the runtime
/// shutting down under it), the lookups are failed rather than left for a task that will never
/// come: the next lookup, finding the queue empty, starts a new one.
struct Pending {
    batcher: Arc<Batcher>,
    taken: bool,
}

impl Pending {
    fn take(mut self) -> (Arc<Batcher>, Vec<Waiting>) {
        self.taken = true;
        (Arc::clone(&self.batcher), self.batcher.drain())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.taken {
            answer_all(self.batcher.drain(), CacheError::Timeout);
        }
    }
}

impl Batcher {
    fn drain(&self) -> Vec<Waiting> {
        std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn answer_all(batch: Vec<Waiting>, error: CacheError) {
    for waiting in batch {
        let _ = waiting.reply.send(Err(error.clone()));
    }
}

/// One lookup's answer: a `GET`'s value, or an `MGET`'s `keys` values.
fn decode(value: Value, keys: usize) -> Result<Values, CacheError> {
    let values = match value {
        Value::ServerError(error) => {
            return Err(CacheError::from(redis::RedisError::from(error)));
        }
        value if keys == 1 => vec![redis::from_redis_value::<Option<Vec<u8>>>(value)?],
        value => redis::from_redis_value::<Values>(value)?,
    };
    if values.len() == keys {
        Ok(values)
    } else {
        Err(CacheError::Redis(redis::ErrorKind::Parse))
    }
}
