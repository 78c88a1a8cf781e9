//! `GET /api/v1/stream`: server-sent events announcing that the fleet changed, so live pages
//! refetch. Changes are coalesced (at most one event a second); the first event is sent at
//! once; comments keep idle connections alive; a stream ends after a while so that the
//! client reconnects and its token is checked again.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::WatchStream;

use super::AppState;
use super::model::Change;

/// The SSE event name of every announcement.
pub const CHANGE_EVENT: &str = "change";
/// At most one announcement per this period; changes in between are merged.
pub const COALESCE: Duration = Duration::from_secs(1);
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// After this the stream ends; EventSource reconnects (and is authenticated again).
pub const MAX_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// The reconnection delay suggested to EventSource, in milliseconds.
const RETRY: Duration = Duration::from_secs(2);

pub async fn stream(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let changes = tokio_stream::StreamExt::throttle(
        WatchStream::new(state.fleet.caches.changes.subscribe()),
        COALESCE,
    )
    .map(|revision| Ok(change_event(revision)))
    .take_until(tokio::time::sleep(MAX_LIFETIME));
    Sse::new(changes).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

fn change_event(revision: u64) -> Event {
    // Serialising a struct of one integer cannot fail; the fallback keeps it total anyway.
    let data = serde_json::to_string(&Change { revision })
        .unwrap_or_else(|_| format!("{{\"revision\":{revision}}}"));
    Event::default().event(CHANGE_EVENT).retry(RETRY).data(data)
}
