//! Native kernel module signing (in progress).
