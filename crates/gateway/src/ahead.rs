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
//! Pages are read ahead a *chunk* at a time: up to [`CHUNK`] of the
//! client's pages in one read of the store (its changes, the documents'
//! leaves, their journals: each one request for the chunk), then cut into
//! the pages the client asks for, [`CHUNKS_AHEAD`] chunks ahead. A server
//! that answers requests one at a time (pouchdb-server) spends a fifth to a
//! quarter less per document on requests of 500 to 1,000 documents than of
//! 100, and with a second chunk read while the first is presented it is
//! kept busy. Fewer pages per chunk while many feeds are read at once
//! ([`AHEAD_ROWS`]), so that what is read ahead stays within the
//! presentation cache.
//!
//! A page read ahead is the answer the feed had a moment before the client
//! asked (documents changed since come on a later page, as they would had
//! the request come earlier), so it is served only when it is younger than
//! [`FRESH`], and a page that ended the feed is read again when asked for:
//! a client paging to the end sees every change made before it asked for
//! the last page. Pages are kept per *feed*: everything that shapes an answer
//! except `since` (database and credentials, version, context, the rewind
//! state, the options), so no client is answered what another's context or
//! credentials produced. Memory is bounded ([`PAGES`] pages in all, the
//! oldest dropped first).

use futures_util::future::{BoxFuture, FutureExt, Shared};
use rewind_store::{Changes, Seq};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Pages read ahead of the last one a client was answered, at least.
pub(crate) const AHEAD: usize = 2;
/// A client's pages read from the store at once, at most: a chunk.
pub(crate) const CHUNK: usize = 10;
/// Chunks read ahead of the client's next page: two, so that the store
/// reads the next chunk while the gateway presents one.
const CHUNKS_AHEAD: usize = 2;
/// Rows read ahead for all feeds together that chunks are sized for (five
/// feeds paging by 100 read chunks of 1,000; fifty feeds, single pages):
/// well within the presentation cache, which holds what is read ahead
/// until the client asks for it.
const AHEAD_ROWS: usize = 10_000;
/// Pages held at most, all feeds together: enough for a hundred phones
/// pulling at once (the pages of their chunks read ahead, and those handed
/// over in the last [`FRESH`] seconds). A page holds its chunk's rows (ids
/// and revisions, bodies only with `include_docs`), not its presentations
/// (those are in the presentation cache).
const PAGES: usize = 512;
/// How long a page read ahead may be served.
const FRESH: Duration = Duration::from_secs(5);

/// A page's answer, to be awaited by the request that takes it (`None` if
/// reading it failed: the request then reads the page itself).
type Answer = Shared<BoxFuture<'static, Option<Arc<Changes>>>>;

/// A page read ahead.
struct Page {
    made: Instant,
    /// The answer of the chunk the page is part of.
    answer: Answer,
    /// Which of the chunk's pages it is.
    part: usize,
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

/// What the reader of a reserved chunk reports its answer with.
pub(crate) struct Reserved {
    /// Where the chunk starts.
    pub since: String,
    /// How many of the client's pages the chunk holds at most: read
    /// `pages × limit` rows.
    pub pages: usize,
    done: tokio::sync::oneshot::Sender<Option<Arc<Changes>>>,
}

impl Reserved {
    /// Hands the chunk's answer (every page of it) to whoever asks for it.
    pub fn finish(self, answer: Option<Changes>) {
        let _ = self.done.send(answer.map(Arc::new));
    }
}

/// Page `part` of a chunk whose pages hold `limit` rows: what reading the
/// feed from where that page starts, with that `limit`, answers (a page
/// before the chunk's last ends at its last row's sequence, the last where
/// the chunk ends).
pub(crate) fn part_of(chunk: &Changes, part: usize, limit: usize) -> Changes {
    let (rows, last_seq) = part_bounds(chunk, part, limit);
    Changes {
        results: chunk.results[rows].to_vec(),
        last_seq: last_seq.clone(),
    }
}

/// The rows of a chunk that page `part` holds ([`part_of`]), and where it
/// ends.
fn part_bounds(chunk: &Changes, part: usize, limit: usize) -> (Range<usize>, &Seq) {
    let len = chunk.results.len();
    let start = part.saturating_mul(limit).min(len);
    let end = start.saturating_add(limit).min(len);
    let last_seq = match chunk.results.get(..end).and_then(<[_]>::last) {
        Some(row) if end < len => &row.seq,
        _ => &chunk.last_seq,
    };
    (start..end, last_seq)
}

/// Where the page after `page` starts, when there may be one (a page
/// shorter than `limit` was the feed's last).
pub(crate) fn next_since(page: &Changes, limit: usize) -> Option<String> {
    next_start(page.results.len(), &page.last_seq, limit)
}

/// [`next_since`] of a page of `rows` rows ending at `last_seq`.
fn next_start(rows: usize, last_seq: &Seq, limit: usize) -> Option<String> {
    (rows >= limit).then(|| last_seq.to_string())
}

impl ReadAhead {
    fn pages(&self) -> std::sync::MutexGuard<'_, Pages> {
        // A panic while the lock was held leaves bookkeeping only.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The page of `feed` starting at `since` whose pages hold `limit`
    /// rows, if it was read ahead, is fresh and did not end the feed, once
    /// (each page is asked for once); its answer is `None` if reading it
    /// failed.
    pub fn take(
        &self,
        feed: &str,
        since: &str,
        limit: usize,
    ) -> Option<impl std::future::Future<Output = Option<Changes>> + use<>> {
        let mut pages = self.pages();
        let page = pages.pages.get_mut(&(feed.to_owned(), since.to_owned()))?;
        // A page that ended the feed when it was read is read again: the
        // end of a feed is always as fresh as the request for it, so a
        // client that pages to the end sees every change made before it
        // asked for the last page (a document changed since its page was
        // read ahead is listed again there).
        if page.taken || page.made.elapsed() >= FRESH || page.next == Some(None) {
            return None;
        }
        page.taken = true;
        let (answer, part) = (page.answer.clone(), page.part);
        Some(async move { answer.await.map(|chunk| part_of(&chunk, part, limit)) })
    }

    /// Records that the chunk of `feed` starting at `since` was read from
    /// the store (`store_page`, rows not yet presented; pages of `limit`
    /// rows): each of its pages is held, and where each page after it starts
    /// is known (`None`: no page after the last).
    pub fn read(&self, feed: &str, since: &str, store_page: &Changes, limit: usize) {
        let mut pages = self.pages();
        let key = (feed.to_owned(), since.to_owned());
        let Some(first) = pages.pages.get(&key) else {
            return;
        };
        let (made, answer) = (first.made, first.answer.clone());
        let parts = store_page.results.len().div_ceil(limit.max(1)).max(1);
        let mut start = since.to_owned();
        for part in 0..parts {
            let (rows, last_seq) = part_bounds(store_page, part, limit);
            let next = next_start(rows.len(), last_seq, limit);
            let page = pages.pages.entry((feed.to_owned(), start)).or_insert(Page {
                made,
                answer: answer.clone(),
                part,
                next: None,
                taken: false,
            });
            page.next = Some(next.clone());
            match next {
                Some(next) => start = next,
                None => break,
            }
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

    /// The next chunk of `feed` to read ahead, reserved for the caller to
    /// read: from the first page within a chunk's pages (at least [`AHEAD`])
    /// from the client's next that is neither held nor being read, when the pages
    /// before it are read far enough to know where it starts. `limit`: the
    /// rows of the client's pages.
    pub fn reserve(&self, feed: &str, limit: usize) -> Option<Reserved> {
        let mut pages = self.pages();
        let (_, mut since) = pages.clients.get(feed)?.clone();
        let feeds = pages.clients.len().max(1);
        let chunk = (AHEAD_ROWS / (feeds * CHUNKS_AHEAD * limit.max(1))).clamp(1, CHUNK);
        for _ in 0..(CHUNKS_AHEAD * chunk).max(AHEAD) {
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
                            part: 0,
                            next: None,
                            taken: false,
                        },
                    );
                    return Some(Reserved {
                        since,
                        pages: chunk,
                        done,
                    });
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_store::{ChangeRev, ChangeRow};
    use serde_json::Value;

    /// A store page of `rows` rows with sequences `from + 1 ..`, ending at
    /// `last`.
    fn page(from: u64, rows: u64, last: u64) -> Changes {
        Changes {
            results: (from + 1..=from + rows)
                .map(|seq| ChangeRow {
                    seq: Value::from(seq),
                    id: format!("d{seq}"),
                    changes: vec![ChangeRev { rev: "1-a".into() }],
                    deleted: false,
                    doc: None,
                })
                .collect(),
            last_seq: Value::from(last),
        }
    }

    fn seqs(page: &Changes) -> (Vec<String>, String) {
        let rows = page.results.iter().map(|r| r.seq.to_string()).collect();
        (rows, page.last_seq.to_string())
    }

    #[test]
    fn a_chunk_is_cut_into_the_pages_the_client_would_have_read() {
        let chunk = page(10, 5, 15);
        assert_eq!(
            seqs(&part_of(&chunk, 0, 2)),
            (vec!["11".into(), "12".into()], "12".into())
        );
        assert_eq!(
            seqs(&part_of(&chunk, 1, 2)),
            (vec!["13".into(), "14".into()], "14".into())
        );
        // The last page ends where the chunk does.
        assert_eq!(
            seqs(&part_of(&chunk, 2, 2)),
            (vec!["15".into()], "15".into())
        );
        assert_eq!(
            next_since(&part_of(&chunk, 2, 2), 2),
            None,
            "a short page ends the feed"
        );
        // Any `limit` a client names.
        assert_eq!(part_of(&chunk, 0, usize::MAX).results.len(), 5);
        assert!(part_of(&chunk, 3, usize::MAX).results.is_empty());
        // A chunk with no row: the page the client would have read.
        let empty = part_of(&page(20, 0, 20), 0, 2);
        assert_eq!(seqs(&empty), (vec![], "20".into()));
    }

    #[tokio::test]
    async fn chunks_are_reserved_ahead_of_the_client_and_each_page_taken_once() {
        // Pages of 10 rows; a chunk of CHUNK pages holds `rows` rows.
        let rows = 10 * CHUNK as u64;
        let at = |seq: u64| seq.to_string();
        let ahead = ReadAhead::default();
        assert!(ahead.reserve("f", 10).is_none(), "no client yet");
        ahead.client_at("f", at(0));
        let first = ahead.reserve("f", 10).expect("the client's next chunk");
        assert_eq!((first.since.clone(), first.pages), (at(0), CHUNK));
        // Where the chunk ends is not known yet.
        assert!(ahead.reserve("f", 10).is_none());
        let store_page = page(0, rows, rows);
        ahead.read("f", &at(0), &store_page, 10);
        // Its pages are held; the next chunk starts after them.
        let second = ahead.reserve("f", 10).expect("the chunk after");
        assert_eq!(second.since, at(rows));
        assert!(ahead.reserve("f", 10).is_none());
        ahead.read("f", &at(rows), &page(rows, rows, 2 * rows), 10);
        assert!(
            ahead.reserve("f", 10).is_none(),
            "{CHUNKS_AHEAD} chunks ahead at most"
        );
        // The client moves on: the window moves with it.
        ahead.client_at("f", at(10));
        assert_eq!(
            ahead.reserve("f", 10).expect("the third chunk").since,
            at(2 * rows)
        );
        first.finish(Some(store_page.clone()));
        for start in [0, 10, rows - 10] {
            let taken = ahead
                .take("f", &at(start), 10)
                .expect("read ahead")
                .await
                .unwrap();
            assert_eq!(taken.results.len(), 10);
            assert_eq!(taken.results[0].seq, Value::from(start + 1));
            assert_eq!(taken.last_seq.to_string(), at(start + 10));
            assert!(ahead.take("f", &at(start), 10).is_none(), "taken once");
        }
        // Another feed (another context or user) shares nothing.
        assert!(ahead.take("g", &at(20), 10).is_none());
        // A reader that failed hands over nothing: the client reads it itself.
        second.finish(None);
        assert!(ahead.take("f", &at(rows + 10), 10).unwrap().await.is_none());
    }

    #[test]
    fn chunks_shrink_while_many_feeds_are_read() {
        let ahead = ReadAhead::default();
        for i in 0..AHEAD_ROWS / 200 {
            ahead.client_at(&format!("feed {i}"), "0".into());
        }
        assert_eq!(ahead.reserve("feed 0", 100).unwrap().pages, 1);
    }

    #[test]
    fn the_last_page_ends_the_reading_and_is_read_again() {
        let ahead = ReadAhead::default();
        ahead.client_at("f", "0".into());
        let first = ahead.reserve("f", 10).unwrap();
        let store_page = page(0, 13, 13);
        ahead.read("f", "0", &store_page, 10);
        assert!(ahead.reserve("f", 10).is_none());
        first.finish(Some(store_page));
        assert!(ahead.take("f", "0", 10).is_some(), "a full page");
        assert!(
            ahead.take("f", "10", 10).is_none(),
            "the feed's end is read when asked for"
        );
    }

    #[test]
    fn memory_is_bounded() {
        let ahead = ReadAhead::default();
        for i in 0..PAGES * 2 {
            let feed = format!("feed {i}");
            ahead.client_at(&feed, "0".into());
            let _ = ahead.reserve(&feed, 100).unwrap();
        }
        assert_eq!(ahead.pages().pages.len(), PAGES);
    }
}
