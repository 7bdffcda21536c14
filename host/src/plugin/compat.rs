//! `airlock:stage@0.1`: the older minor, still served.
//!
//! 0.2 only added functions, so every 0.1 function is its 0.2 namesake. The
//! generated 0.1 value types have other Rust names but the same shapes and
//! field names, so they are converted through serde (`same_shape`); the one
//! bulky value, `packed-texts`, is moved field by field. Resources are the
//! same host types in both worlds.

use wasmtime::Result;
use wasmtime::component::Resource;

use super::bindings::airlock::stage as v2;
use super::bindings_v0_1::airlock::stage as v1;
use super::host::{FileHandle, HostState, ModelHandle};

/// Converts between the two worlds' copies of one WIT type.
pub(crate) fn same_shape<A: serde::Serialize, B: serde::de::DeserializeOwned>(a: A) -> Result<B> {
    let v = serde_json::to_value(a).map_err(|e| wasmtime::format_err!("airlock:stage@0.1 conversion: {e}"))?;
    serde_json::from_value(v).map_err(|e| wasmtime::format_err!("airlock:stage@0.1 conversion: {e}"))
}

impl v1::types::Host for HostState {}
impl v1::artifact::Host for HostState {}

impl v1::artifact::HostFile for HostState {
    fn path(&mut self, f: Resource<FileHandle>) -> Result<String> {
        v2::artifact::HostFile::path(self, f)
    }
    fn size(&mut self, f: Resource<FileHandle>) -> Result<u64> {
        v2::artifact::HostFile::size(self, f)
    }
    fn format(&mut self, f: Resource<FileHandle>) -> Result<v1::artifact::Format> {
        same_shape(v2::artifact::HostFile::format(self, f)?)
    }
    fn parse_error(&mut self, f: Resource<FileHandle>) -> Result<Option<v1::artifact::ParseError>> {
        same_shape(v2::artifact::HostFile::parse_error(self, f)?)
    }
    fn read(&mut self, f: Resource<FileHandle>, offset: u64, len: u32) -> Result<Result<Vec<u8>, String>> {
        v2::artifact::HostFile::read(self, f, offset, len)
    }
    fn tensors(&mut self, f: Resource<FileHandle>) -> Result<Vec<v1::artifact::TensorInfo>> {
        same_shape(v2::artifact::HostFile::tensors(self, f)?)
    }
    fn alignment(&mut self, f: Resource<FileHandle>) -> Result<Option<u64>> {
        v2::artifact::HostFile::alignment(self, f)
    }
    fn data_offset(&mut self, f: Resource<FileHandle>) -> Result<Option<u64>> {
        v2::artifact::HostFile::data_offset(self, f)
    }
    fn metadata_keys(&mut self, f: Resource<FileHandle>) -> Result<Vec<String>> {
        v2::artifact::HostFile::metadata_keys(self, f)
    }
    fn metadata(&mut self, f: Resource<FileHandle>, key: String) -> Result<Option<v1::artifact::MetaValue>> {
        same_shape(v2::artifact::HostFile::metadata(self, f, key)?)
    }
    fn metadata_kind(&mut self, f: Resource<FileHandle>, key: String) -> Result<Option<v1::artifact::MetaKind>> {
        same_shape(v2::artifact::HostFile::metadata_kind(self, f, key)?)
    }
    fn metadata_packed_texts(
        &mut self,
        f: Resource<FileHandle>,
        key: String,
    ) -> Result<Option<v1::artifact::PackedTexts>> {
        Ok(v2::artifact::HostFile::metadata_packed_texts(self, f, key)?
            .map(|p| v1::artifact::PackedTexts { bytes: p.bytes, ends: p.ends }))
    }
    fn version(&mut self, f: Resource<FileHandle>) -> Result<Option<u32>> {
        v2::artifact::HostFile::version(self, f)
    }
    fn sha256(&mut self, f: Resource<FileHandle>) -> Result<Result<String, String>> {
        v2::artifact::HostFile::sha256(self, f)
    }
    fn drop(&mut self, f: Resource<FileHandle>) -> Result<()> {
        v2::artifact::HostFile::drop(self, f)
    }
}

impl v1::artifact::HostModel for HostState {
    fn name(&mut self, m: Resource<ModelHandle>) -> Result<String> {
        v2::artifact::HostModel::name(self, m)
    }
    fn kind(&mut self, m: Resource<ModelHandle>) -> Result<String> {
        v2::artifact::HostModel::kind(self, m)
    }
    fn files(&mut self, m: Resource<ModelHandle>) -> Result<Vec<Resource<FileHandle>>> {
        v2::artifact::HostModel::files(self, m)
    }
    fn surroundings(&mut self, m: Resource<ModelHandle>) -> Result<Vec<v1::artifact::Surrounding>> {
        same_shape(v2::artifact::HostModel::surroundings(self, m)?)
    }
    fn drop(&mut self, m: Resource<ModelHandle>) -> Result<()> {
        v2::artifact::HostModel::drop(self, m)
    }
}

impl v1::context::Host for HostState {
    fn config(&mut self) -> Result<String> {
        v2::context::Host::config(self)
    }
    fn origin(&mut self) -> Result<Option<v1::context::RecordedOrigin>> {
        same_shape(v2::context::Host::origin(self)?)
    }
    fn pinned_sha256(&mut self) -> Result<Option<String>> {
        v2::context::Host::pinned_sha256(self)
    }
    fn pinned_files(&mut self) -> Result<Vec<(String, String)>> {
        v2::context::Host::pinned_files(self)
    }
}

impl v1::log::Host for HostState {
    fn log(&mut self, level: v1::log::Level, message: String) -> Result<()> {
        v2::log::Host::log(self, same_shape(level)?, message)
    }
}

impl v1::sidecars::Host for HostState {
    fn sidecar(&mut self, suffix: String) -> Result<Result<Option<Vec<u8>>, String>> {
        v2::sidecars::Host::sidecar(self, suffix)
    }
}

impl v1::inference::Host for HostState {
    fn generate(&mut self, prompt: String, opts: v1::inference::Options) -> Result<Result<String, String>> {
        v2::inference::Host::generate(self, prompt, same_shape(opts)?)
    }
}
