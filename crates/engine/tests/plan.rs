//! `plan`: reports its progress page by page, and writes nothing.

use rewind_engine::plan::plan;
use rewind_engine::state::Database;
use rewind_store::Store;
use rewind_testkit::{load_sample, TempDir};

mod common;
use common::cht;

#[tokio::test]
async fn plan_reports_progress_after_each_page_up_to_every_document() {
    let dir = TempDir::new();
    let target = dir.file("medic.db");
    load_sample(&target, 250, 3).await;
    let db = Database::inspect(&target).await.unwrap();
    let before = db.data.info().await.unwrap();
    let mut seen = Vec::new();
    let planned = plan(&db, &cht(), None, 40, &mut |read| seen.push(read))
        .await
        .unwrap();
    assert_eq!(planned.docs, 250);
    assert_eq!(
        seen.len(),
        250usize.div_ceil(40),
        "one report per page: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(seen.last(), Some(&250));
    assert!(planned.rewritten > 0 && planned.rewritten <= 250);
    let after = db.data.info().await.unwrap();
    assert_eq!(after.update_seq, before.update_seq, "plan wrote");
}
