//! Reading a paged changes feed ahead of the client.
//!
//! A phone pulling a database asks for one changes page at a time
//! (`since`, `limit`), and every page costs the gateway several requests to
//! the store and the presentation of its documents, one after the other. The
//! page after it starts where it ends, so the gateway starts reading it as
//! soon as the store has answered for the page in hand, and keeps
//! [`AHEAD`] pages read ahead of what the client asked: the store's work for
//! one page then overlaps the gateway's for another.
//!
//! A page read ahead is the answer the feed had a moment before the client
//! asked (documents changed since come on a later page, as they would had
//! the request come earlier), so it is served only when it is younger than
//! [`FRESH`]. Pages are kept per *feed*: everything that shapes an answer
//! except `since` (database and credentials, version, context, the rewind
//! state, the options), so no client is answered what another's context or
//! credentials produced. Memory is bounded ([`PAGES`] pages in all, the
//! oldest dropped first).

use futures_util::future::{BoxFuture, FutureExt, Shared};
use rewind_store::Changes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Pages read ahead of the last one a client was answered.
pub(crate) const AHEAD: usize = 2;
/// Pages held at most, all feeds together: enough for a hundred phones
/// pulling at once ([`AHEAD`] each, and the one each is being answered). A
/// page holds its rows (ids and revisions, bodies only with `include_docs`),
/// not its presentations (those are in the presentation cache).
const PAGES: usize = 256;
/// How long a page read ahead may be served.
const FRESH: Duration = Duration::from_secs(5);

/// A page's answer, to be awaited by the request that takes it (`None` if
/// reading it failed: the request then reads the page itself).
type Answer = Shared<BoxFuture<'static, Option<Arc<Changes>>>>;

/// A page read ahead.
struct Page {
    made: Instant,
    answer: Answer,
    /// Where the page after it starts, once the store's part of it is read
    /// (`Some(None)`: it is the feed's last).
    next: Option<Option<String>>,
    /// A client was handed it: it is kept (until it is stale) only to say
    /// where the next page starts, so that it is not read again.
    taken: bool,
}

/// The pages read ahead, by feed and `since`, and where each feed's client
/// is (the `since` of the page it will ask for next).
#[derive(Default)]
pub(crate) struct ReadAhead(Mutex<Pages>);

#[derive(Default)]
struct Pages {
    pages: HashMap<(String, String), Page>,
    clients: HashMap<String, (Instant, String)>,
}

/// What the reader of a reserved page reports its answer with.
pub(crate) struct Reserved {
    /// Where the page starts.
    pub since: String,
    done: tokio::sync::oneshot::Sender<Option<Arc<Changes>>>,
}

impl Reserved {
    /// Hands the page's answer to whoever asks for it.
    pub fn finish(self, answer: Option<Changes>) {
        let _ = self.done.send(answer.map(Arc::new));
    }
}

impl ReadAhead {
    fn pages(&self) -> std::sync::MutexGuard<'_, Pages> {
        // A panic while the lock was held leaves bookkeeping only.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The page of `feed` starting at `since`, if it was read ahead and is
    /// fresh, once (each page is asked for once).
    pub fn take(&self, feed: &str, since: &str) -> Option<Answer> {
        let mut pages = self.pages();
        let page = pages.pages.get_mut(&(feed.to_owned(), since.to_owned()))?;
        if page.taken || page.made.elapsed() >= FRESH {
            return None;
        }
        page.taken = true;
        Some(page.answer.clone())
    }

    /// Records that the page of `feed` starting at `since` was read from the
    /// store: the page after it starts at `next` (`None`: no page after).
    pub fn read(&self, feed: &str, since: &str, next: Option<String>) {
        if let Some(page) = self
            .pages()
            .pages
            .get_mut(&(feed.to_owned(), since.to_owned()))
        {
            page.next = Some(next);
        }
    }

    /// Records that `feed`'s client will ask next for the page at `since`.
    pub fn client_at(&self, feed: &str, since: String) {
        let mut pages = self.pages();
        pages.clients.retain(|_, (at, _)| at.elapsed() < FRESH);
        pages
            .clients
            .insert(feed.to_owned(), (Instant::now(), since));
    }

    /// The next page of `feed` to read ahead, reserved for the caller to
    /// read: the first page within [`AHEAD`] of the client's that is neither
    /// held nor being read, when the pages before it are read far enough to
    /// know where it starts.
    pub fn reserve(&self, feed: &str) -> Option<Reserved> {
        let mut pages = self.pages();
        let (_, mut since) = pages.clients.get(feed)?.clone();
        for _ in 0..AHEAD {
            match pages.pages.get(&(feed.to_owned(), since.clone())) {
                Some(page) => match &page.next {
                    Some(Some(next)) => since = next.clone(),
                    // The feed ends there, or where it ends is not read yet
                    // (its reader reserves the next when it knows).
                    _ => return None,
                },
                None => {
                    pages.pages.retain(|_, p| p.made.elapsed() < FRESH);
                    while pages.pages.len() >= PAGES {
                        let oldest = pages
                            .pages
                            .iter()
                            .min_by_key(|(_, p)| p.made)
                            .map(|(key, _)| key.clone())?;
                        pages.pages.remove(&oldest);
                    }
                    let (done, answer) = tokio::sync::oneshot::channel();
                    let answer = async move { answer.await.ok().flatten() }.boxed().shared();
                    pages.pages.insert(
                        (feed.to_owned(), since.clone()),
                        Page {
                            made: Instant::now(),
                            answer,
                            next: None,
                            taken: false,
                        },
                    );
                    return Some(Reserved { since, done });
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(last: &str, rows: usize) -> Changes {
        Changes {
            results: Vec::with_capacity(rows),
            last_seq: serde_json::Value::from(last),
        }
    }

    #[tokio::test]
    async fn pages_are_reserved_ahead_of_the_client_and_taken_once() {
        let ahead = ReadAhead::default();
        assert!(ahead.reserve("f").is_none(), "no client yet");
        ahead.client_at("f", "10".into());
        let first = ahead.reserve("f").expect("the client's next page");
        assert_eq!(first.since, "10");
        // Where the page after it starts is not known yet.
        assert!(ahead.reserve("f").is_none());
        ahead.read("f", "10", Some("20".into()));
        let second = ahead.reserve("f").expect("the page after");
        assert_eq!(second.since, "20");
        ahead.read("f", "20", Some("30".into()));
        assert!(ahead.reserve("f").is_none(), "{AHEAD} pages ahead at most");
        first.finish(Some(page("20", 1)));
        let taken = ahead.take("f", "10").expect("read ahead");
        assert_eq!(taken.await.unwrap().last_seq, "20");
        assert!(ahead.take("f", "10").is_none(), "taken once");
        // A page handed over is not read again while the client is on it.
        ahead.client_at("f", "10".into());
        assert!(ahead.reserve("f").is_none(), "10 and 20 are held");
        // Another feed (another context or user) shares nothing.
        assert!(ahead.take("g", "20").is_none());
        // The client moves on: the window moves with it.
        ahead.client_at("f", "20".into());
        assert_eq!(ahead.reserve("f").expect("the next window").since, "30");
        // A reader that failed hands over nothing: the client reads it itself.
        second.finish(None);
        assert!(ahead.take("f", "20").unwrap().await.is_none());
    }

    #[test]
    fn the_last_page_ends_the_reading() {
        let ahead = ReadAhead::default();
        ahead.client_at("f", "0".into());
        let _first = ahead.reserve("f").unwrap();
        ahead.read("f", "0", None);
        assert!(ahead.reserve("f").is_none());
    }

    #[test]
    fn memory_is_bounded() {
        let ahead = ReadAhead::default();
        for i in 0..PAGES * 2 {
            let feed = format!("feed {i}");
            ahead.client_at(&feed, "0".into());
            let _ = ahead.reserve(&feed).unwrap();
        }
        assert_eq!(ahead.pages().pages.len(), PAGES);
    }
}
